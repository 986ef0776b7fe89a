"""ImageDataProvider: cuda-convnet2's `image` provider (spec §10.2, §10.3) on NVIDIA DALI.

Reader processes (image_reader.py) unpickle and plan each data batch and lays its JPEGs out in
shared memory, one padded matrix per DALI run (image_plan.JpegRuns). One DALI graph
(`image_graph`) cuts each row back to its JPEG, decodes it ("mixed" on CUDA: nvJPEG plus the
hardware decoder; "cpu" otherwise) and cuts each view with crop_mirror_normalize. The outputs
reach torch through DLPack on the provider's device, where the centre crop of the mean image is
subtracted: no image makes a host round trip. While the trainer works on batch k, a decoder
thread runs DALI on batch k + 1 in runs of `dali_batch` images, `runs_ahead` of them in flight
so that DALI's host stage (parsing, Huffman decoding), the hardware decoder and its GPU kernels
overlap; meanwhile the reader processes prepare batch k + 2. The training process does a few
Python calls per run, not per image: its GIL stays free for the trainer's kernel launches.
What each case shows (crops, flips, noise, labels, bad-image replacement) is decided on the host
from (seed, epoch, batchnum) by image_plan.py, where the draws are documented.
"""

import contextlib
import copy
import math
import os
from concurrent.futures import ThreadPoolExecutor, wait
from io import BytesIO

import numpy as np
import torch

from ..errors import DataError, OptionError
from .batches import (META_NAME, CursorProvider, DataBatch, ProviderOptions, list_batches,
                      load_meta, meta_int, read_batch, require_batches)
from .image_plan import NUM_COLORS, NUM_VIEWS, CasePlanner, JpegRuns, jpeg_size
from .image_reader import ImageReader, ReadBatch

__all__ = ["ImageDataProvider", "image_graph", "jpeg_size"]
HW_DECODER_LOAD = 0.65    # share of JPEGs for the hardware decoder; nvJPEG's CUDA path: the rest


def _dali():
    try:
        from nvidia.dali import fn, pipeline, types
    except ImportError:
        raise DataError("the image provider needs NVIDIA DALI, which is not installed: pip "
                        "install nvidia-dali-cuda130 (the [image] extra)") from None
    return fn, pipeline, types


def image_graph(num_views, inner, scale, decoder_device):
    """The one DALI graph of train, test and multiview: per view v, the inner² crop at the
    normalised origin (crop_x<v>, crop_y<v>), mirrored where mirror<v>, as float CHW
    scale * (pixel - channel_offset). The provider feeds each input as one array per run: the
    JPEGs as a padded matrix (a row per case) with each row's length."""
    fn, _, types = _dali()
    # no_copy: DALI reads the rows where the reader process wrote them; the provider keeps
    # that memory unchanged until the run's outputs are out.
    padded = fn.external_source(name="jpegs", dtype=types.UINT8, no_copy=True)
    lengths = fn.external_source(name="lengths", dtype=types.INT32)
    jpegs = fn.slice(padded, 0, lengths, axes=[0])
    channel_offset = fn.external_source(name="channel_offset", dtype=types.FLOAT)
    extra = {"hw_decoder_load": HW_DECODER_LOAD} if decoder_device == "mixed" else {}
    # No EXIF rotation: ccn2's libjpeg decode ignored it, and the header's W x H must hold.
    images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB,
                               adjust_orientation=False, **extra)
    views = []
    for v in range(num_views):
        x = fn.external_source(name=f"crop_x{v}", dtype=types.FLOAT)
        y = fn.external_source(name=f"crop_y{v}", dtype=types.FLOAT)
        mirror = fn.external_source(name=f"mirror{v}", dtype=types.INT32)
        views.append(fn.crop_mirror_normalize(
            images, crop=(inner, inner), crop_pos_x=x, crop_pos_y=y, mirror=mirror,
            mean=channel_offset, scale=scale, dtype=types.FLOAT, output_layout="CHW"))
    return views


class ImageDataProvider(CursorProvider):
    description = "JPEG-encoded image data provider"
    # Measured on one H200 with 256x256 batch JPEGs (BENCHMARKS.md): runs of 256 images, 3 in
    # flight, and at most 8 DALI threads per process decode fastest.
    dali_batch = 256      # images per DALI run; a data batch takes several runs
    runs_ahead = 3        # DALI runs in flight while the decoder thread copies one out
    dali_threads = 8
    reader_processes = 2  # read and plan batches k + 1 and k + 2 side by side

    def __init__(self, data_path, batch_range=None, *, init_epoch=1, init_batchnum=None,
                 test=False, options=ProviderOptions(), rank=0, world_size=1):
        self.data_path, self.batch_meta = data_path, load_meta(data_path)
        batch_range = list_batches(data_path) if batch_range is None else list(batch_range)
        require_batches(data_path, batch_range)
        self.batch_range, self.test, self.options = batch_range, test, options
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(options.device)
        if self.device.type == "cuda" and self.device.index is None:
            # The decoder thread has its own current device: name ours explicitly.
            self.device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(batch_range, init_epoch, init_batchnum)
        self.multiview = bool(options.multiview) and test
        self.num_views = NUM_VIEWS if self.multiview else 1
        self.noise = 0.0 if test else float(options.color_noise)
        # The whole training batch is scaled by 1/(1+c) to keep it near the test data (§10.3).
        self.scale = 1.0 / (1.0 + self.noise)
        self._check_meta()
        self.skipped_images = 0          # bad images replaced so far (skip_bad_images)
        self._warnings, self._num_cases = [], {}
        self._pipe, self._depth = None, 0    # used by the decoder thread only
        self._ahead = None               # (key, future of _decode) of the next batch
        self._reads = {}                 # {key: future of _read} of the batch after that one
        self._image_reader = ImageReader(self.planner, data_path, self.reader_processes)
        # The reader threads only wait on the reader processes; the decoder thread drives DALI.
        self._reader_threads = ThreadPoolExecutor(max_workers=self.reader_processes,
                                                  thread_name_prefix="image-reader")
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-decoder")
        self._copy_stream = None
        if self.device.type == "cuda":
            self._copy_stream = torch.cuda.Stream(self.device)

    # -- the provider contract (batches.Provider) ----------------------------------------------

    def get_next_batch(self):
        key = self._cursor.position
        if self._ahead is None or self._ahead[0] != key:
            self._ahead = key, self._submit(key)
        decoding = self._ahead[1]
        self._cursor.advance()
        upcoming = self._cursor.position
        self._ahead = upcoming, self._submit(upcoming)    # queued behind batch `key`
        # The read of the batch after runs while `upcoming` decodes: a consumer faster than the
        # reader would otherwise wait for each read and then each decode, one after the other.
        following = copy.copy(self._cursor)
        following.advance()
        if following.position not in self._reads:
            self._reads[following.position] = self._reader_threads.submit(self._read,
                                                                          following.position)
        return DataBatch(key[0], key[1], self._to_mats(*decoding.result()), self.num_views)

    def get_data_dims(self, idx=0):
        return [self.inner_size ** 2 * NUM_COLORS, 1, self.get_num_classes()][idx]

    def get_num_classes(self):
        return len(self.label_names)

    def num_cases(self, batchnum):
        """Cases in the whole data batch (before sharding, one view); reads, never decodes."""
        if batchnum not in self._num_cases:
            self._num_cases[batchnum] = len(read_batch(self.data_path, batchnum)["data"])
        return self._num_cases[batchnum]

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._discard_prefetch()

    def take_warnings(self):
        """Lines about bad images replaced since the last call (for the trainer to print)."""
        lines, self._warnings = self._warnings, []
        return lines

    def close(self):
        """Stop the threads and the reader processes, and free DALI's buffers (a prefetched batch
        holds device memory)."""
        self._discard_prefetch()
        self._reader_threads.shutdown(wait=True, cancel_futures=True)
        self._decoder.shutdown(wait=True, cancel_futures=True)
        self._pipe = None
        self._image_reader.close()

    def _discard_prefetch(self):
        """Drop the batches read or decoding ahead; their slots go back to the reader."""
        readings = list(self._reads.values())
        self._reads = {}
        if self._ahead is not None:
            self._ahead[1].cancel()
            wait([self._ahead[1]])      # the decoder thread must be done with the pipeline
            readings.append(self._ahead[1].reading)
            self._ahead = None
        for reading in readings:
            if not reading.cancel():
                wait([reading])
                if reading.exception() is None:
                    reading.result().release()

    # -- metadata -----------------------------------------------------------------------------

    def _check_meta(self):
        """Validate batches.meta; set the image sizes, the mean crop and the case planner."""
        meta, options = self.batch_meta, self.options
        where = os.path.join(self.data_path, META_NAME)
        names = meta.get("label_names")
        if not isinstance(names, (list, tuple)) or not names:
            raise DataError(f"{where}: expected 'label_names', a non-empty list of class names")
        self.label_names = [str(name) for name in names]
        mean = meta.get("data_mean")
        num_vis = meta_int(self.data_path, meta, "num_vis", getattr(mean, "size", 0))
        size = self.img_size = math.isqrt(num_vis // NUM_COLORS)
        if num_vis < NUM_COLORS or NUM_COLORS * size * size != num_vis:
            raise DataError(f"{where}: 'num_vis' = {num_vis} is not 3 x S x S for an image size")
        inner = self.inner_size = options.inner_size or size
        if not 0 < inner <= size:
            raise OptionError(f"--inner-size {options.inner_size} must lie in 1..{size} (the "
                              f"image size of {self.data_path})")
        self.mean_crop = None
        if options.scalar_mean < 0:
            if not isinstance(mean, np.ndarray) or mean.size != num_vis:
                raise DataError(f"{where}: expected 'data_mean' with {num_vis} values (the "
                                f"3x{size}x{size} mean image), got {getattr(mean, 'shape', mean)}")
            # The same centre crop of the mean is subtracted from every crop (§10.3 quirk).
            b = (size - inner) // 2
            planes = mean.astype(np.float32).reshape(NUM_COLORS, size, size)
            self.mean_crop = torch.from_numpy(
                np.ascontiguousarray(planes[:, b:b + inner, b:b + inner])).to(self.device)
        pca = None
        if self.noise > 0:
            try:
                pca = tuple(np.asarray(part, np.float64).reshape(shape)
                            for part, shape in zip(meta["color_pca"], [3, (3, 3)]))
            except (KeyError, TypeError, ValueError):
                pca = ()
            if len(pca) != 2 or not all(np.isfinite(part).all() for part in pca):
                raise DataError(f"{where}: --color-noise needs 'color_pca' = (stdevs of shape "
                                f"(3,), eigenvectors of shape (3, 3) as columns)")
        self.planner = CasePlanner(
            inner=inner, num_classes=len(self.label_names),
            label_offset=meta_int(self.data_path, meta, "label_offset", 0), test=self.test,
            multiview=self.multiview, color_noise=self.noise, color_pca=pca,
            scalar_mean=options.scalar_mean, skip_bad_images=options.skip_bad_images,
            seed=options.seed, minibatch=options.minibatch, rank=self.rank,
            world_size=self.world_size, img_size=size)

    # -- reading, planning, decoding ----------------------------------------------------------

    def _submit(self, key):
        reading = self._reads.pop(key, None) or self._reader_threads.submit(self._read, key)
        decoding = self._decoder.submit(self._decode, reading)
        decoding.reading = reading
        return decoding

    def _read(self, key):
        """Batch `key` read and planned by the reader process (reader thread). A data error is
        raised when the trainer asks for that batch."""
        batch = self._image_reader.read(key, self.dali_batch)
        self._num_cases[key[1]] = batch.num_images
        return batch

    def _decode(self, reading):
        """Batch images (views x cases, 3, inner, inner) on the provider's device (decoder
        thread). When DALI fails on a batch, the images PIL cannot decode either are marked bad
        and the batch is read, planned and decoded again here (or a DataError says which image
        it was)."""
        batch = reading.result()
        try:
            while True:
                try:
                    return batch, self._run_dali(batch.plan, batch.jpegs)
                except RuntimeError as e:
                    batch.release()
                    batch = self._read_decodable(batch.key, e)
        finally:
            batch.release()

    def _read_decodable(self, key, error):
        """Batch `key` read in this process, planned without the images PIL cannot decode."""
        host = self.planner.read(self.data_path, *key)
        self._mark_undecodable(host, self.planner.plan(host).sources, error)
        plan = self.planner.plan(host)
        return ReadBatch(key, str(host.path), len(host.jpegs), plan,
                         JpegRuns.pack(host.jpegs, plan.sources, self.dali_batch),
                         self.planner.replacement_warnings(host, plan))

    def _run_dali(self, plan, jpegs):
        count, inner = len(plan.sources), self.inner_size
        stream = torch.cuda.stream(self._copy_stream) if self._copy_stream is not None \
            else contextlib.nullcontext()
        with stream:
            images = torch.empty((count * self.num_views, NUM_COLORS, inner, inner),
                                 dtype=torch.float32, device=self.device)
            bounds = np.cumsum([0] + [rows for _, rows, _ in jpegs.runs]).tolist()
            runs = list(zip(bounds[:-1], bounds[1:]))       # the cases of each DALI run
            try:
                if runs and self._pipe is None:
                    self._pipe = self._build_pipeline(depth=min(self.runs_ahead, len(runs)))
                    # A new pipeline's first schedule_run starts `depth` runs at once.
                    for k in range(self._depth):
                        self._feed(plan, jpegs, k, runs[k])
                    self._pipe.schedule_run()
                else:
                    for k in range(min(self._depth, len(runs))):
                        self._feed(plan, jpegs, k, runs[k])
                        self._pipe.schedule_run()
                for k, (start, stop) in enumerate(runs):
                    self._copy_out(images, count, start, stop)
                    if k + self._depth < len(runs):
                        self._feed(plan, jpegs, k + self._depth, runs[k + self._depth])
                        self._pipe.schedule_run()
            except BaseException:
                self._pipe = None        # a pipeline with runs in flight or failed is dropped
                raise
        return images

    def _feed(self, plan, jpegs, run, cases):
        """One array per input for DALI run `run`, which shows cases[0]..cases[1] - 1."""
        start, stop = cases
        self._pipe.feed_input("jpegs", jpegs.matrix(run))
        self._pipe.feed_input("lengths", jpegs.lengths[start:stop, None])
        for name, values in plan.feeds.items():
            self._pipe.feed_input(name, values[start:stop])

    def _copy_out(self, images, count, start, stop):
        """Rows start..stop of every view, minus the scaled centre crop of the mean image."""
        outputs = self._pipe.share_outputs()
        try:
            for v, output in enumerate(outputs):
                view = torch.from_dlpack(output.as_tensor())                  # zero-copy
                target = images[v * count + start:v * count + stop]          # view-major rows
                if self.mean_crop is None:
                    target.copy_(view)
                else:
                    torch.sub(view, self.mean_crop, alpha=self.scale, out=target)
            if self._copy_stream is not None:
                # DALI reuses its buffers once released, unaware of torch's stream.
                self._copy_stream.synchronize()
        finally:
            self._pipe.release_outputs()

    def _build_pipeline(self, depth):
        _, pipeline, _ = _dali()
        on_cuda = self.device.type == "cuda"
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        pipe = pipeline.Pipeline(batch_size=self.dali_batch,
                                 num_threads=max(1, min(self.dali_threads,
                                                        cpus // self.world_size)),
                                 device_id=self.device.index if on_cuda else None,
                                 prefetch_queue_depth=depth, exec_dynamic=True,
                                 seed=self.options.seed % 2**31)
        with pipe:
            pipe.set_outputs(*image_graph(self.num_views, self.inner_size, self.scale,
                                          "mixed" if on_cuda else "cpu"))
        pipe.build()
        self._depth = depth
        return pipe

    def _mark_undecodable(self, host, sources, error):
        """After DALI failed on a batch, mark the images PIL cannot decode either as bad; if
        there are none, the failure is DALI's own and is reported as such."""
        from PIL import Image
        found = False
        for index in sorted(set(sources.tolist())):
            try:
                with Image.open(BytesIO(host.jpegs[index])) as image:
                    image.load()
            except Exception as e:    # whatever PIL raises, the image is undecodable
                host.sizes[index] = f"undecodable JPEG ({type(e).__name__}: {e})"
                found = True
        if not found:
            raise DataError(f"{host.path}: DALI could not decode the batch "
                            f"({' '.join(str(error).split())[:300]})")

    def _to_mats(self, batch, images):
        """The batch's matrices on the trainer's stream, with the replaced images reported."""
        device, plan = self.device, batch.plan
        if self._copy_stream is not None:
            # Made on the copy stream (complete: the decoder thread synchronised it); the
            # allocator must not hand its memory out again before the trainer's kernels ran.
            images.record_stream(torch.cuda.current_stream(device))
        self.skipped_images += len(batch.warnings)
        self._warnings += batch.warnings
        count = len(plan.sources)
        labels = torch.from_numpy(plan.labels).to(device)
        hot = torch.zeros((count, self.get_num_classes()), dtype=torch.float32, device=device)
        rows, cols = (torch.tensor(index, dtype=torch.long, device=device) for index in plan.hot)
        hot[rows, cols] = 1.0
        return [images, labels.repeat(self.num_views), hot.repeat(self.num_views, 1)]
