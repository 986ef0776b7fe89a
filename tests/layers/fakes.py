"""Stand-ins for built layers, for tests that construct one layer at a time."""


class FakeInput:
    """Stands in for an already-built input layer: only what consumers may look at."""

    def __init__(self, name="in", outputs=None, channels=None, size=None, gpus=(0,),
                 type_name="fake"):
        self.name, self.channels, self.img_size, self.gpus = name, channels, size, list(gpus)
        self.type_name = type_name
        self.outputs = outputs if outputs is not None else channels * size * size
