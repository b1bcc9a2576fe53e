"""The ServerApp: FedAvg over the boards' LoRA adapters (sidetune/bench/fedlora.py)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from sidetune.bench.fedlora import server_main

    server_main(grid, context)
