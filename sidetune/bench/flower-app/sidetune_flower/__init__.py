"""sidetune bench cohort's Flower app: federated LoRA (the code is sidetune/bench/fedlora.py)."""
