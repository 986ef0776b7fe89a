"""ImageDataProvider: cuda-convnet2's `image` provider (spec §10.2, §10.3) on NVIDIA DALI.

JPEG bytes from the batch files enter one DALI graph (`image_graph`) through external_source;
it decodes them ("mixed" on CUDA: nvJPEG plus the hardware decoder; "cpu" otherwise) and cuts
each view with crop_mirror_normalize. The outputs reach torch through DLPack on the provider's
device, where the centre crop of the mean image is subtracted: no image makes a host round trip.
While the trainer works on batch k, DALI decodes batch k + 1 and a reader thread unpickles k + 2.
What each case shows (crops, flips, noise, labels, bad-image replacement) is decided on the host
from (seed, epoch, batchnum) by image_plan.py, where the draws are documented.
"""

import math
import os
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO

import numpy as np
import torch

from ..errors import DataError, OptionError
from .batches import (META_NAME, BatchCursor, DataBatch, ProviderOptions, list_batches,
                      load_meta, read_batch, require_batches)
from .image_plan import NUM_COLORS, NUM_VIEWS, CasePlanner, jpeg_size, locate

__all__ = ["ImageDataProvider", "image_graph", "jpeg_size"]
HW_DECODER_LOAD = 0.65    # share of JPEGs for the hardware decoder; nvJPEG's CUDA path: the rest


def _dali():
    try:
        from nvidia.dali import fn, pipeline, types
    except ImportError:
        raise DataError("the image provider needs NVIDIA DALI (nvidia-dali-cuda130)") from None
    return fn, pipeline, types


def image_graph(num_views, inner, scale, decoder_device):
    """The one DALI graph of train, test and multiview: per view v, the inner² crop at the
    normalised origin (crop_x<v>, crop_y<v>), mirrored where mirror<v>, as float CHW
    scale * (pixel - channel_offset). The provider feeds every input per sample."""
    fn, _, types = _dali()
    jpegs = fn.external_source(name="jpegs", dtype=types.UINT8)
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


class ImageDataProvider:
    description = "JPEG-encoded image data provider"

    def __init__(self, data_path, batch_range=None, *, init_epoch=1, init_batchnum=None,
                 test=False, options=ProviderOptions(), rank=0, world_size=1):
        self.data_path, self.batch_meta = data_path, load_meta(data_path)
        batch_range = list_batches(data_path) if batch_range is None else list(batch_range)
        require_batches(data_path, batch_range)
        self.batch_range, self.test, self.options = batch_range, test, options
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(options.device)
        self._cursor = BatchCursor(batch_range, init_epoch, init_batchnum)
        self.multiview = bool(options.multiview) and test
        self.num_views = NUM_VIEWS if self.multiview else 1
        self.noise = 0.0 if test else float(options.color_noise)
        # The whole training batch is scaled by 1/(1+c) to keep it near the test data (§10.3).
        self.scale = 1.0 / (1.0 + self.noise)
        self._check_meta()
        self.skipped_images = 0          # bad images replaced so far (skip_bad_images)
        self._warnings, self._num_cases = [], {}
        self._pipe, self._capacity = None, 0
        self._inflight = None            # (key, host, plan, error) of the batch DALI works on
        self._pending = None             # (key, future) of the batch the reader thread reads
        self._in_use = None              # DALI outputs that queued CUDA kernels still read
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-reader")

    # -- the provider contract ----------------------------------------------------------------

    @property
    def cursor(self):
        return self._cursor.position

    def get_next_batch(self):
        key = self._cursor.position
        if self._inflight is None:
            self._launch(key)
        mats = self._collect()
        self._cursor.advance()
        upcoming = BatchCursor(self.batch_range, *self._cursor.position)
        self._launch(upcoming.advance())
        if self._pending is None or self._pending[0] != upcoming.position:
            self._pending = upcoming.position, self._reader.submit(self._read, upcoming.position)
        return DataBatch(key[0], key[1], mats, self.num_views)

    def get_data_dims(self, idx=0):
        return [self.inner_size ** 2 * NUM_COLORS, 1, self.get_num_classes()][idx]

    def get_num_classes(self):
        return len(self.label_names)

    def num_cases(self, batchnum):
        """Cases in the whole data batch (before sharding, one view); reads, never decodes."""
        if batchnum not in self._num_cases:
            self._num_cases[batchnum] = len(read_batch(self.data_path, batchnum)["data"])
        return self._num_cases[batchnum]

    def state_dict(self):
        """The cursor is all: every draw comes from (seed, epoch, batchnum)."""
        return self._cursor.state_dict()

    def load_state_dict(self, state):
        self._cursor.load_state_dict(state)
        self._discard_prefetch()

    def take_warnings(self):
        """Lines about bad images replaced since the last call (for the trainer to print)."""
        lines, self._warnings = self._warnings, []
        return lines

    def close(self):
        """Free DALI's buffers and the reader thread (a prefetched batch holds device memory)."""
        self._discard_prefetch()
        self._in_use = None
        self._reader.shutdown(wait=True, cancel_futures=True)

    def _discard_prefetch(self):
        # Dropping the pipeline is the simple way to drop its run in flight; the next batch
        # builds a new one.
        self._inflight = self._pending = self._pipe = None

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
        num_vis = int(meta.get("num_vis", getattr(mean, "size", 0)))
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
            label_offset=int(meta.get("label_offset", 0)), test=self.test,
            multiview=self.multiview, color_noise=self.noise, color_pca=pca,
            scalar_mean=options.scalar_mean, skip_bad_images=options.skip_bad_images,
            seed=options.seed, minibatch=options.minibatch, rank=self.rank,
            world_size=self.world_size)

    def _read(self, key):
        host = self.planner.read(self.data_path, *key)
        self._num_cases[key[1]] = len(host.jpegs)
        return host

    # -- DALI ---------------------------------------------------------------------------------

    def _launch(self, key):
        """Read (or take the reader's) batch `key`, plan it and start DALI on it. A data error
        is kept, and raised when that batch is asked for."""
        pending, self._pending = self._pending, None
        try:
            host = pending[1].result() if pending and pending[0] == key else self._read(key)
            plan = self.planner.plan(host)
        except DataError as e:
            self._inflight = key, None, None, e
            return
        self._start(plan)
        self._inflight = key, host, plan, None

    def _start(self, plan):
        count = len(plan.sources)
        if count and (self._pipe is None or count > self._capacity):
            self._build_pipeline(max(count, self._capacity,
                                     int(self.batch_meta.get("batch_size", 0)) // self.world_size))
        if count:
            for name, values in plan.feeds.items():
                self._pipe.feed_input(name, values)
            self._pipe.schedule_run()

    def _build_pipeline(self, capacity):
        _, pipeline, _ = _dali()
        on_cuda = self.device.type == "cuda"
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        device_id = (torch.cuda.current_device() if self.device.index is None
                     else self.device.index) if on_cuda else None
        # We feed and run one batch at a time, so a queue of one suffices; the dynamic executor
        # keeps an output alive for as long as a DLPack tensor refers to it.
        pipe = pipeline.Pipeline(batch_size=capacity, num_threads=max(1, cpus // self.world_size),
                                 device_id=device_id, prefetch_queue_depth=1, exec_dynamic=True,
                                 seed=self.options.seed % 2**31)
        with pipe:
            pipe.set_outputs(*image_graph(self.num_views, self.inner_size, self.scale,
                                          "mixed" if on_cuda else "cpu"))
        pipe.build()
        self._pipe, self._capacity = pipe, capacity

    def _collect(self):
        key, host, plan, error = self._inflight
        self._inflight = None
        if error is not None:
            raise error
        outputs = []
        while len(plan.sources):
            try:
                outputs = self._pipe.share_outputs()
                break
            except RuntimeError as e:
                self._pipe = None          # a DALI pipeline that failed cannot run again
                self._mark_undecodable(host, plan, e)
                plan = self.planner.plan(host)
                self._start(plan)
        mats = self._to_mats(outputs, plan)
        if outputs:
            self._pipe.release_outputs()
        for case, index in plan.replaced:
            self.skipped_images += 1
            self._warnings.append(f"{locate(host.path, case)}: {host.sizes[case]}; "
                                  f"replaced by image {index} of the batch")
        return mats

    def _mark_undecodable(self, host, plan, error):
        """After DALI failed on a batch, mark the images PIL cannot decode either as bad; if
        there are none, the failure is DALI's own and is reported as such."""
        from PIL import Image
        found = False
        for index in sorted(set(plan.sources.tolist())):
            try:
                with Image.open(BytesIO(host.jpegs[index])) as image:
                    image.load()
            except Exception as e:    # whatever PIL raises, the image is undecodable
                host.sizes[index] = f"undecodable JPEG ({type(e).__name__}: {e})"
                found = True
        if not found:
            raise DataError(f"{host.path}: DALI could not decode the batch "
                            f"({' '.join(str(error).split())[:300]})")

    def _to_mats(self, outputs, plan):
        count, inner, device = len(plan.sources), self.inner_size, self.device
        images = torch.empty((count * self.num_views, NUM_COLORS, inner, inner),
                             dtype=torch.float32, device=device)
        views = [torch.from_dlpack(output.as_tensor()) for output in outputs]   # zero-copy
        for v, view in enumerate(views):
            target = images[v * count:(v + 1) * count]                 # view-major rows
            if self.mean_crop is None:
                target.copy_(view)
            else:
                torch.sub(view, self.mean_crop, alpha=self.scale, out=target)
        if device.type == "cuda" and views:
            # DALI may reuse a buffer once its tensor is gone, unaware of torch's stream: keep
            # this batch's views until the kernels reading them have run.
            done = torch.cuda.Event()
            done.record()
            previous, self._in_use = self._in_use, (views, done)
            if previous is not None:
                previous[1].synchronize()
        labels = torch.from_numpy(plan.labels).to(device)
        hot = torch.zeros((count, self.get_num_classes()), dtype=torch.float32, device=device)
        rows, cols = (torch.tensor(index, dtype=torch.long, device=device) for index in plan.hot)
        hot[rows, cols] = 1.0
        return [images, labels.repeat(self.num_views), hot.repeat(self.num_views, 1)]
