"""The training scripts, beside the runtime library.

Nothing in ``magdr`` or ``daemon`` imports them. Each is a command (``python -m training.<name>``)
that writes weights the runtime loads from ``magdr/models/weights/`` (see its ``MODEL_CARD.md``
and ``docs/training-log.md``):

- ``purifier``: the learned purifier P against a generator G (and its distilled small copy);
- ``stargan``: the default StarGAN generator;
- ``parser``: the small default face parser (ParseNet);
- ``classifier``: attribute classifiers (evaluation, hair-only evaluation, G's teacher);
- ``evaluate``: the bars the parser and G are measured against.

They need nothing beyond the runtime's dependencies, so no extra installs them.
"""
