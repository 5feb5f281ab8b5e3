"""vitssl: self-supervised ViT pretraining on DeepSpeed, from WebDataset shards to INT8 students.

Everything is imported under this one name (``vitssl.train``, ``vitssl.models``,
``vitssl.data_pipelines``, ``vitssl.slurm``), never as bare ``train`` or ``models``: those
names clash with a user's own ``train.py`` / ``models.py`` next to their data (``python -m``
puts the working directory first on ``sys.path``) and with other distributions that install a
top-level ``models`` package. The design card keeps the folders at the top of the checkout;
this folder holds a link to each, and the wheel installs them as real subpackages.
"""
