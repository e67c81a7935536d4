"""Graph passes of lora_fx (installed as ``lora_fx.passes``); one pass per module, in pipeline order.

* :mod:`.capture`: front-end selection (torch.fx, torch.export, or fx falling back to export).
* :mod:`.trace_fx`: torch.fx front-end: an ``nn.Module`` → a hierarchy of ``GraphModule`` s.
* :mod:`.trace_export`: torch.export front-end, rebuilt into the same hierarchy.
* :mod:`.follow_mode`: makes an exported graph follow ``.train()`` / ``.eval()``.
* :mod:`.find_sites`: pure analysis: which parameters reach which ops.
* :mod:`.match_recompute`: which adapter inputs can be recomputed in backward.
* :mod:`.insert_lora`: registers adapters and inserts merge / factored nodes.
* :mod:`.fold`: evaluates the deltas once and writes plain weights into a new module.
"""
