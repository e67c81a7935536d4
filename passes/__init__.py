"""Graph passes of lora_fx (installed as ``lora_fx.passes``); one pass per module.

* :mod:`.trace`: front-ends turning an ``nn.Module`` into a hierarchy of ``GraphModule`` s.
* :mod:`.find_sites`: pure analysis: which parameters reach which ops.
* :mod:`.insert_lora`: registers adapters and inserts merge / factored nodes.
* :mod:`.fold`: evaluates the deltas once and writes plain weights into a new module.
"""
