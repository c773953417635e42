"""Pure evaluation code: tensors and files in, typed reports out.

Nothing here imports from ``server`` or ``worker``; every module can be used from a notebook.
"""
