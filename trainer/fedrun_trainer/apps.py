"""The Flower ServerApp and ClientApp objects that fedrun's FAB points at.

Kept import-light on purpose: every Flower message starts a ``flwr-clientapp`` process
that imports this module, so torch and Opacus are imported only by the handlers that
train or evaluate, and ``hello``/``shutdown`` answer in well under a second.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedrun_trainer.hospital import handlers as hospital

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    from fedrun_trainer.server.federation import run_federation

    run_federation(grid, context)


@client_app.query("hello")
def _hello(msg: Message, context: Context) -> Message:
    return hospital.hello(msg, context)


@client_app.query("shutdown")
def _shutdown(msg: Message, context: Context) -> Message:
    return hospital.shutdown(msg, context)


@client_app.train("round")
def _train(msg: Message, context: Context) -> Message:
    return hospital.train(msg, context)


@client_app.evaluate("final")
def _evaluate(msg: Message, context: Context) -> Message:
    return hospital.evaluate(msg, context)
