"""Interoperation with other stacks: PEFT (``peft.py``), ONNX export (``onnx.py``) and the check of
which models the timm patch supports (``support.py``). Each module imports its library lazily."""
