"""Alpha matting as a task: a one-channel alpha head trained on continuous mattes.

metrics.py   SAD, MSE, gradient and connectivity errors (Rhemann et al. 2009)
losses.py    alpha L1, alpha gradient and Laplacian-pyramid losses
data.py      float alpha targets (matte / 255) in the shared pipeline
evaluate.py  the four errors and the thresholded IoU at original resolution
outputs.py   the alpha, cut-out and overlay PNGs of inference
run.py       the task inside seg-train runs: fit metrics, validation, report, infer
export.py    the alpha SavedModel and its parity check
"""


def is_matting_data(data) -> bool:
    """Whether a run's `data` config selects the matting task (`data.task=matting`)."""
    return data.get("task", "segmentation") == "matting"
