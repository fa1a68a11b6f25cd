"""CLI: python -m rlaif_jax.data.synthetic --out DIR [...]

`--rl_videos N` writes, instead of a world, only N new videos of its RL split with their PPO
prompts, truth and oracle pairs (generate_rl_split)."""
import argparse
import json

from rlaif_jax.data.synthetic.generate import generate_rl_split, generate_world


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic video world.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num_train", type=int, default=512)
    parser.add_argument("--num_eval", type=int, default=64)
    parser.add_argument("--frames", type=int, default=8, help="frames per video")
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels (32, 64, 96...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rl_videos", type=int, default=0,
                        help="N > 0: only N new RL-split videos, prompts and oracle pairs")
    args = parser.parse_args(argv)
    if args.rl_videos:
        print(json.dumps(generate_rl_split(args.out, args.rl_videos, args.frames, args.size,
                                           args.seed)))
        return
    manifest = generate_world(args.out, args.num_train, args.num_eval, args.frames, args.size,
                              args.seed)
    print(json.dumps(manifest["counts"]))


if __name__ == "__main__":
    main()
