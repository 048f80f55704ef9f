"""Alpha matting as a task: a one-channel alpha head trained on continuous mattes.

metrics.py  SAD, MSE, gradient and connectivity errors (Rhemann et al. 2009)
losses.py   alpha L1, alpha gradient and Laplacian-pyramid losses
"""
