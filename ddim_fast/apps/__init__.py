"""The applications layer: what is built on the samplers. It imports the sampling, models,
ops and base layers, never the command line. One sub-package per concern:

    pretrained   the embedded models (digits UNet, digit classifier), registered with UNet.from_pretrained
    data         the embedded 16x16 digits data set
    pipelines    accelerate(pipe): diffusers' DDIMPipeline, StableDiffusion(Img2Img)Pipeline and
                 StableDiffusionXLPipeline with FastSampler's loop (core: what they share; ddim,
                 stable_diffusion, stable_diffusion_xl: each pipeline's call)
    runs         long runs: sample generation sharded across torchrun processes (distributed),
                 restartable, in a run folder that never mixes or loses samples (run_folder, files)
    quality      the paper's tables on the digits model (tables), FID/KID on the digit classifier's
                 features (metrics, classifier), guidance strength (guidance), training the embedded
                 models (train)
    census       what one sampling step dispatches, its bytes and FLOPs (opcount, on fake tensors for
                 full-size models: models), a roofline model of it on an H100 / H200 (roofline), and
                 what a measurement records about where it ran (machine)
"""
