"""The batch job as a Ray Data pipeline: one engine per actor, records streamed back to the
driver, which appends them (so resuming works exactly as without Ray). Extra `ray`."""

from __future__ import annotations

import json

from lmforge.errors import LmforgeError


class _Generator:
    """A Ray Data actor: loads the model once, then turns batches of requests into records."""

    def __init__(self, model: str, target: str | None):
        from lmforge.model import load

        self.model = load(model, target=target, progress=False)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from lmforge.batch import Item, generate_record

        records = [
            json.dumps(generate_record(self.model, Item(int(line), json.loads(id_), json.loads(req))))
            for line, id_, req in zip(batch["line"], batch["id"], batch["request"])
        ]
        return {"record": np.array(records, dtype=object)}


def run_on_ray(model: str, items: list, writer, target: str | None, address: str | None, workers: int) -> None:
    """Run `items` on a local Ray (address None) or the cluster at `address`."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise LmforgeError("--ray needs Ray: pip install 'lmforge[ray]'") from None
    if not items:
        return
    from lmforge.export.targets import DEFAULT_TARGET
    from lmforge.model import cached_onnx

    # convert once here: actors on this machine find the cached folder (others convert their own)
    cached_onnx(model, target or DEFAULT_TARGET)
    import logging

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    try:
        ray.init(
            address=address,
            ignore_reinit_error=True,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
        )
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise LmforgeError(
            f"cannot reach Ray at {address or 'a new local instance'}: {str(e).splitlines()[0][:160]}"
        ) from None
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    rows = [{"line": it.line, "id": json.dumps(it.id), "request": json.dumps(it.request)} for it in items]
    ds = ray.data.from_items(rows).map_batches(
        _Generator,
        fn_constructor_kwargs={"model": str(model), "target": target},
        concurrency=max(1, workers),
        batch_size=4,
        batch_format="numpy",
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for record in batch["record"]:
            writer.write(json.loads(record))
