"""effgen: post-training quantization and edge deployment of image generators.

The top-level folders are the stages of one flow (DESIGN §1):
models -> calib -> exporter -> engines -> runtime. `effgen.runtime` needs neither
torch nor diffusers, so a bundle runs on a device that has only ONNX Runtime or TensorRT.
"""

__version__ = "0.1.0"
