"""The one path from parameters to GIFs: the inference core (generator.py) and the commands built on it,
`yagg sample` (sample.py) and `yagg export` (export.py). Training's samples, `yagg eval` and the server draw their
clips through the same `Generator`.
"""
