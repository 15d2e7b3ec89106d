"""TensorRT engines for a bundle: built on the device that will run them (engines are not
portable across GPUs or TensorRT versions). Imports no torch; TensorRT itself is imported only
when an engine is actually built."""
