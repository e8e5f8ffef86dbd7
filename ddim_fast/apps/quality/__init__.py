"""The paper's quality tables on the embedded digits model: its metric, its classifier, guidance, and training them."""
