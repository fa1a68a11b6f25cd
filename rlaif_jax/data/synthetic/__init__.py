"""The bundled synthetic video world: generator, truth, scorer and tokenizer.

    python -m rlaif_jax.data.synthetic --out DIR [--num_train N --num_eval M --frames T
                                                  --size S --seed K]
    python -m rlaif_jax.data.synthetic --out DIR --rl_videos N [--seed K]   (more RL prompts)
"""
from rlaif_jax.data.synthetic.generate import (clip_path, generate_rl_split, generate_world,
                                               load_manifest, load_truth, video_name,
                                               video_path)
from rlaif_jax.data.synthetic.render import encode_mp4, render_frames
from rlaif_jax.data.synthetic.scorer import Score, preference, score_answer
from rlaif_jax.data.synthetic.text import (answerable_specs, describe, describe_clips,
                                           parse_question, question_text, true_answer,
                                           wrong_answer)
from rlaif_jax.data.synthetic.world import clip_frame_ranges, restrict_to_frames

__all__ = [
    "Score", "answerable_specs", "clip_frame_ranges", "clip_path", "describe", "describe_clips",
    "encode_mp4", "generate_rl_split", "generate_world", "load_manifest", "load_truth",
    "parse_question", "preference", "question_text", "render_frames", "restrict_to_frames",
    "score_answer", "true_answer", "video_name", "video_path", "wrong_answer",
]
