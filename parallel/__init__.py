"""Devices: the (data, fsdp) mesh, shardings from logical axis names, and joining a job of several processes.

Shared by training, evaluation and inference; the model itself knows no mesh (it names its axes, the rules in the
config map them to mesh axes here).
"""
