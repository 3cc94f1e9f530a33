"""`lalm serve`: an OpenAI-compatible audio chat server with continuous batching.

- `schemas.py`: request/response shapes of the OpenAI API and its error JSON.
- `media.py`: audio parts (base64, data: URLs, allowed local files) -> 16 kHz waves.
- `engine.py`: one engine thread that schedules requests onto `lalm.generate`'s pieces.
- `app.py`: the FastAPI routes and the web page in `static/`.
- `cli.py`: the `lalm serve` command.
"""
