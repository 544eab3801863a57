"""The field's evaluation metrics on a stated protocol (docs/evaluation.md).

- `fd`: Fréchet distance and KVD between feature sets;
- `weights`: the weight files of the evaluation networks (user-placed, never downloaded);
- `vggish`: VGGish and its log-mel front end (FAD);
- `text_scores`: CLIP text-frame and CLAP text-audio scores (transformers' classes);
- `av_align`: AV-Align in the published form (optical-flow peaks, librosa-style onsets);
- `protocol`: clip sampling and resampling of the evaluation protocol, and its hash;
- `suite`: per-clip outputs of generated and reference clips, the metrics, the table;
- `benchmark`: `make eval-avsync15` (generate a split for joint and cascade, score, tabulate).
"""
