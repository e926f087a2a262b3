"""The file `can --num-processes N` hands to accelerate's launcher (`can_entry.py`).

It lives in a folder of its own because Python puts a script's folder first on `sys.path`: this folder holds no
module named like a package of ours or a user's, so every child process imports the installed `train`, `bridge` and
`can_jax`, whatever the working directory holds.
"""
