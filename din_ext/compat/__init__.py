"""Drop-in DIN classes for users of other libraries: one import changes, din_ext's kernels run inside.

- ``din_ext.compat.deepctr.DIN``: DeepCTR-Torch's constructor, feature columns and compile/fit/evaluate/predict
  (``pip install din_ext[deepctr]`` for DeepCTR-Torch's own feature columns; duck-typed ones work without it).
- ``din_ext.compat.recbole.DIN``: a RecBole 1.2 model class for RecBole's Trainer (``pip install din_ext[recbole]``).

The submodules are imported on demand, so neither library is needed to import din_ext.
"""
