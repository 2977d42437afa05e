"""cnn_lab's CPU convolution kernels, behind one seam: a `lax.conv_general_dilated` stand-in.

XLA's CPU convolution keeps about one core busy and, for every kernel gradient, copies the
activations into a batch-minor layout (recomputing batch norm and ReLU on the way). oneDNN
(the library behind PyTorch's CPU convolutions) computes the forward pass and both gradients
on NHWC arrays directly, with every core, but puts channels in its vector lanes:
convolutions with few channels (LeNet-5's 3 -> 6 -> 16) leave most lanes idle. cnn_lab's
batch-minor kernels put 16 images in each lane instead. `config.model.conv_implementation`
picks:

- "xla": `lax.conv_general_dilated`, on any backend.
- "onednn": oneDNN through XLA's FFI (CPU). Calls it does not take (not float32, grouped,
  transposed, negative padding, not 2-D NHWC/HWIO, an empty output) run XLA's convolution
  instead.
- "batch_minor": the batch-minor kernels (CPU) for stride-1, undilated convolutions of
  batches that are a multiple of 16 (on each device); other calls go to "onednn". XLA lays
  their activations out batch-minor and fuses the transposes into neighbouring ops, which
  pays only where every convolution is small (docs/cpu_kernels.md has the figures).
- "auto": on a float32 CPU run where the kernels load, "batch_minor" for models whose class
  declares `few_channel_convolutions` (LeNet-5) on a CPU with AVX-512, else "onednn"; "xla"
  elsewhere: accelerators always get XLA's own kernels.

A run may have any number of CPU devices and processes: each device runs the kernels on its
own shard of the batch, with its share of the cores (`devices`). `selection.cpu_devices`
holds the rule for how many devices a run of the kernels splits into by default.

Modules: `selection` resolves the name (the one place `auto` is decided) and hands out the
callable; `stand_ins` holds the callables and their gradients; `devices` splits their FFI
calls over a batch-sharded mesh and sizes their thread teams; `build` compiles, loads and
registers onednn_conv.cc and batch_minor_conv.cc on first use. `cnn_lab.models.get_model`
imports this package only for a CPU backend (or an explicit CPU choice), so other hosts
never load or build any of it.
"""
