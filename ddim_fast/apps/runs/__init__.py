"""Long sampling runs: sharded across processes, restartable, never mixing or losing samples."""
