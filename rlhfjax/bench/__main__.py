"""`python -m rlhfjax.bench WHICH [flags]` (see `rlhfjax.bench`)."""

from rlhfjax.bench import main

if __name__ == "__main__":
  main()
