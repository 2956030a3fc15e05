"""A small synthetic English-like corpus for end-to-end runs (no download, deterministic)."""
import random
from pathlib import Path

WORDS = ("the king queen said unto them and lord of people city river house light night "
         "day went came saw heard spoke great small old new ship sea land war peace").split()


def write_corpus(directory: Path, docs: int = 40, lines: int = 60, seed: int = 0) -> Path:
    """`docs` text files of `lines` random 12-word sentences each; returns `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(docs):
        text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "."
                         for _ in range(lines))
        (directory / f"doc{i}.txt").write_text(text)
    return directory
