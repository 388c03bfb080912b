"""Channel pruning (``--method channel``): removes whole channels so the network itself
is smaller and faster, with MOON fine-tuning between the pruning steps.

The modules, each importing only those above it in this list (no cycle):

- :mod:`~moonprune.sparsity.channel.entry`: the method's registry entry (what it is,
  when it steps, its options), which :data:`moonprune.sparsity.METHODS` lists;
- :mod:`~moonprune.sparsity.channel.structure`: MACs and parameters, layer widths,
  and a pruned network's sizes (recorded, and rebuilt on a fresh model);
- :mod:`~moonprune.sparsity.channel.allocation`: the ``global`` allocation (a
  cost-aware ranking of channels across layers) and pruning to given widths;
- :mod:`~moonprune.sparsity.channel.uniform`: the ``uniform`` allocation (the same
  fraction of every layer);
- :mod:`~moonprune.sparsity.channel.plan`: the target, the candidates and the plan
  of the ``latency`` allocation;
- :mod:`~moonprune.sparsity.channel.search`: candidates timed in onnxruntime
  (:mod:`moonprune.speed`), one chosen;
- :mod:`~moonprune.sparsity.channel.settings`: the run's target, steps and epochs per
  stage, checked before training;
- :mod:`~moonprune.sparsity.channel.pruner`: :class:`ChannelPruner
  <moonprune.sparsity.channel.pruner.ChannelPruner>`, one step at a time, with its
  ``state_dict``;
- :mod:`~moonprune.sparsity.channel.state`: the resumable training state;
- :mod:`~moonprune.sparsity.channel.training`: the run, prune and fine-tune per
  stage, resumable.

Outside the package, :mod:`moonprune.checkpoints`, :mod:`moonprune.verification`,
``moonprune.exporters.inspection`` and :mod:`moonprune.pipeline` use the structure
functions, and :data:`moonprune.sparsity.METHODS` lists the method (its registry
entry, ``moonprune methods``). This ``__init__`` imports
nothing, so reading a pruned checkpoint does not load the training loop.
"""
