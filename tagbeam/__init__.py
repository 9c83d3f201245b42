"""What `pipelines` and `trainer` agree on, as code both sides import.

- `tagbeam.flags`: how an option is declared once (a dataclass field) and turned into argparse flags,
  forwarded to another entry point, and checked against Beam's own options.
- `tagbeam.dataset`: the dataset directory (docs/dataset.md): `DatasetInfo` (dataset.json), the
  enums both sides need, labels.txt, the dead-letter record.
- `tagbeam.export`: the trainer's model directory and the SavedModel's signature and asset names.
- `tagbeam.workspace`: the retraining workspace (runs/, champion.json, history.jsonl).
- `tagbeam.storage`: paths and small whole-file reads and atomic writes, local or gs://.

Nothing here imports TensorFlow, so every entry point's --help stays instant.
"""
