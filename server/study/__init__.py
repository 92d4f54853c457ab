"""The clipping study (``gradwatch study``): which remedy keeps exploding gradients in check,
and at what cost, measured with gradwatch on one model.

One study trains one problem (:mod:`.problem`) with several optimizers, each at a low and a
high learning rate, once per remedy (no clip, ``by_value``, ``by_norm``, ``global_norm``,
``zclip``, ``autoclip``), streams every run to a gradwatch server, reads the recorded norms,
losses and clip counts back over the REST API (:mod:`.runner`) and reports them as a table,
a generated summary, JSON and a self-contained HTML page.

Modules: :mod:`.plan` (what to train, option parsing), :mod:`.problem` (built-in problems
and ``--model module:function``), :mod:`.threshold` (the clip limits from a warm-up),
:mod:`.train` (one ``model.fit`` with a monitor; the only module importing TensorFlow and
the agent), :mod:`.runner`, :mod:`.divergence`, :mod:`.summary`, :mod:`.result` (value
objects and JSON), :mod:`.table`, :mod:`.svg` and :mod:`.page` (the report).
Nothing here imports TensorFlow at import time except :mod:`.train`.
"""
