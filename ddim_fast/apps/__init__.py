"""The applications layer: what is built on the samplers. It imports the sampling, models,
ops and base layers, never the command line.

    pretrained    the embedded models (digits UNet, digit classifier), registered with UNet.from_pretrained
    data          the embedded 16x16 digits data set
    classifier    the digit classifier behind the quality metric
    quality       FID on classifier features and the paper's Tables 1 and 2 on the digits model
    train         training the embedded models
    distributed   sample generation sharded across torchrun processes, restartable
    machine       what a measurement records about where it ran (commit, CPU)
    opcount       what one sampling step dispatches (ops per step), for tests and benchmarks; its bytes and
                  FLOPs (the census), on fake tensors for full-size models (census_models builds them)
    roofline      a roofline model of one step on an H100 / H200, from the census
    pipelines     accelerate(pipe): a diffusers DDIMPipeline / StableDiffusionPipeline (text or image to
                  image) with FastSampler's loop; pipeline_core what they share, stable_diffusion the SD ones
"""
