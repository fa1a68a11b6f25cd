"""CLI: python -m rlaif_jax.data.synthetic --out DIR [...]"""
import argparse
import json

from rlaif_jax.data.synthetic.generate import generate_world


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic video world.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num_train", type=int, default=512)
    parser.add_argument("--num_eval", type=int, default=64)
    parser.add_argument("--frames", type=int, default=8, help="frames per video")
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels (32, 64, 96...)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    manifest = generate_world(args.out, args.num_train, args.num_eval, args.frames, args.size,
                              args.seed)
    print(json.dumps(manifest["counts"]))


if __name__ == "__main__":
    main()
