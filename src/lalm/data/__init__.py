"""Training data: manifest readers (`manifest.py`) and the offline corpus builder.

The builder (`lalm data build`, `build.py`) plans clips and examples (`tasks.py`, `evalsets.py`)
from text generators (`sentences.py`, `phrases.py`, `facts.py`, `prompts.py`), then renders the
clips in parallel (`render.py` over `voices.py`, `sounds.py`, `music.py`).
"""
