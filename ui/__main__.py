"""`python -m ui`: launch DiT Studio (see `ui/app.py` for the flags)."""
from .app import main

main()
