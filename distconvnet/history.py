"""A run's position and its costs: the two records the loop keeps, the console prints from and
the checkpoint stores."""

from dataclasses import dataclass

import torch


@dataclass
class RunState:
    """Where a run is in its training data: the last batch trained (`epoch`, `batchnum`;
    batchnum None before the first) and the next one (`cursor`, as the training provider walks
    its range). The one record of position: the loop, the metrics and the checkpoint read it
    here."""

    batch_range: list       # --train-range
    num_epochs: int         # --epochs
    epoch: int = 1
    batchnum: int | None = None
    cursor: tuple = (1, None)

    def trained(self, epoch, batchnum, cursor):
        self.epoch, self.batchnum, self.cursor = epoch, batchnum, tuple(cursor)

    def finished(self):
        return self.cursor[0] > self.num_epochs

    def batches_done(self):
        """Training batches done since the start of training (the metrics' step)."""
        if self.batchnum is None:
            return 0
        return self._count(self.epoch, self.batchnum)

    def progress(self, epoch, batchnum):
        """spec §2: clamp((batches_done − 1) / (epochs × len(train_range)), 0, 1), for the batch
        (epoch, batchnum) about to be trained."""
        done = self._count(epoch, batchnum)
        return min(max((done - 1) / (self.num_epochs * len(self.batch_range)), 0.0), 1.0)

    def _count(self, epoch, batchnum):
        return len(self.batch_range) * (epoch - 1) + list(self.batch_range).index(batchnum) + 1


class History:
    """The raw cost sums and cases of every training batch and test event (spec §7), and the
    values printed from them: each printed cost's output filter (usually: divided by the
    cases), children folded into their parents."""

    def __init__(self, model, test_range_length, train=(), test=()):
        self._filters = [(name, model.layers[name].output_filter)
                         for name in model.printed_costs]
        self._test_range_length = test_range_length
        self.train, self.test = [tuple(o) for o in train], [tuple(o) for o in test]

    def record_train(self, sums, cases):
        return self._record(self.train, sums, cases)

    def record_test(self, sums, cases):
        return self._record(self.test, sums, cases)

    def _record(self, history, sums, cases):
        """Append the batch's sums to `history`; returns the printed costs."""
        raw = raw_sums(sums)
        history.append((raw, cases))
        return self.filtered(raw, cases)

    def printed(self, sums, cases):
        return self.filtered(raw_sums(sums), cases)

    def filtered(self, raw, cases):
        return [(name, list(output_filter(raw[name], max(cases, 1))))
                for name, output_filter in self._filters]

    def test_averages(self):
        """The last len(test_range) test events, case-weighted (spec §7)."""
        recent = self.test[-self._test_range_length:]
        cases = sum(n for _, n in recent)
        totals = {}
        for sums, _ in recent:
            for name, values in sums.items():
                totals[name] = [a + b for a, b in zip(totals.get(name, [0.0] * len(values)),
                                                      values)]
        return self.filtered(totals, cases)


def raw_sums(sums):
    """{cost name: [float]} of device or host sums, in one copy to the host."""
    if not sums:
        return {}
    flat = torch.cat([values.detach().double().flatten() for values in sums.values()])
    numbers = flat.tolist()
    raw, start = {}, 0
    for name, values in sums.items():
        raw[name], start = numbers[start:start + values.numel()], start + values.numel()
    return raw
