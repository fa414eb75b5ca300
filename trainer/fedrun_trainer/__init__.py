"""What runs in fedrun's pods: the Flower server and hospital apps, data, model, DP-SGD."""
