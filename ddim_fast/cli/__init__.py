"""The command line layer: `ddim-fast` (also `python -m ddim_fast.cli`), one module per
command group. It may import every layer below it; nothing imports it but the package's
`python -m ddim_fast`.

    ddim-fast sample --out grid.png                 # 64 digits from the embedded model
    ddim-fast sample --steps 20 --compare           # and time ReferenceSampler vs FastSampler
    ddim-fast encode --input digits --out latents.npz
    ddim-fast interpolate --seeds 0 1 --frames 8 --out interp.png
    ddim-fast quality --quick --json quality.json   # the paper's Tables 1 and 2 in shape
    ddim-fast bench --batch-size 16                 # reference vs fast over S
    ddim-fast train --out digits.pt                 # retrain the embedded model

Bad arguments, and files that cannot be read or written (a full disk), give one line on
stderr and exit code 2 (DDIM_FAST_TRACEBACK=1 shows the traceback instead); output paths are
checked before any work; progress bars go to stderr and --quiet turns them off.

    args      the parser class, value types and option groups
    common    device, progress, --model loading, samplers from the arguments, images out, timing
    sample    the sample and interpolate commands (--out-dir: apps/runs/run_folder.py, apps/runs/distributed.py)
    encode, quality, bench, train: the command of that name
    main      the parser of every command, and main()
"""

from .main import build_parser, main

__all__ = ["main", "build_parser"]
