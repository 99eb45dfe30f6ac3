"""Long stories: sliding-window consistency with memory-bounded, chunked denoising and resume.

Files: ``window.py`` (the attention mode), ``denoise.py`` (the chunk loop), ``checkpoint.py``; the
step-synchronous denoiser they drive is ``storydiff/lockstep.py``.

The scheme (what ``storydiff generate --mode window`` runs):

* All frames advance together, one denoising step at a time; the UNet sees one chunk of ``chunk_size``
  consecutive frames at a time. The latents of the frames not in the UNet wait in host memory (64 KiB a
  frame at 1024²), their text conditioning is encoded again when their chunk comes, and every chunk has
  its own copy of the scheduler (schedulers keep per-step state). So GPU memory depends on the chunk size
  and the window, not on the story length.
* Consistency: in every consistent layer a frame that shows a character attends to its own tokens plus the
  sampled tokens (K/V, drawn per step, level and frame) of the frames within ``window`` of it that also
  show one ([NC] frames neither read nor offer tokens).
* Chunk boundaries: a chunk sees a neighbour outside it only if that neighbour's chunk was already computed
  at the current step; its sampled K/V wait in a cache that holds just the current step and just the frames
  some pending frame can still read (at most ``window`` frames per boundary). A neighbour not yet computed
  at this step is not seen at all: nothing from the previous step is kept, so no state crosses a step
  boundary and a checkpoint needs only latents and scheduler state. To keep the missing side from always
  being the same, the chunks are swept forward on even steps and backward on odd steps, so each boundary
  frame sees both sides on alternate steps.
* Key property (tested): with ``chunk_size >= frames`` there is one chunk per step and the computation is
  exactly the unchunked one.
* Resume: every ``checkpoint_every`` steps the latents, the schedulers, the step and the RNG state are
  written atomically to ``checkpoint.pt`` with a fingerprint of the run (prompts, seeds, settings, config,
  model); a resumed run checks the fingerprint and continues from the last checkpoint, producing the frames
  an uninterrupted run would. Frames are decoded and written one by one after the last step.
"""
