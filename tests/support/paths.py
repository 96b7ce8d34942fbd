"""Where things are: the repository and the shared real CT."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REAL_CT = REPO.parent / "shared" / "data" / "real-ct"
SMALL = (64, 64, 24)  # phantom voxels: big enough for anatomy, small enough for 2 CPU cores
