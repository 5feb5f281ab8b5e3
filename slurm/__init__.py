"""sbatch templates and the submit helper (``python -m slurm.submit``)."""
