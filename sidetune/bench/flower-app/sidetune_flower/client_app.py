"""The ClientApp: each board's local LoRA epochs from the global adapter (sidetune/bench/fedlora.py)."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    from sidetune.bench.fedlora import client_train

    return client_train(msg, context)
