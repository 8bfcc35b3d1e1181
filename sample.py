"""Sample from a DiT: `python sample.py` (bundled digits model) — see `python sample.py --help`."""
from dit.cli.sample import main

if __name__ == "__main__":
    main()
