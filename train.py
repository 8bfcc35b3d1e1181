"""Train a DiT: `python train.py --data digits --max-steps 2000` or
`accelerate launch --multi_gpu --num_processes N train.py ...` (see README)."""
from dit.training import main

if __name__ == "__main__":
    main()
