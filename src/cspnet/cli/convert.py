"""``cspnet convert --from timm cspresnext50 SRC OUT.safetensors``: other libraries' weights to cspnet."""
from __future__ import annotations

from ..interop import conversions, convert_file, get_conversion
from ..weights import read_metadata


def register(sub) -> None:
    known = sorted(conversions())
    listing = "; ".join(f"{lib} {src} -> {conv.model}" for (lib, src), conv in sorted(conversions().items()))
    p = sub.add_parser(
        "convert",
        help="convert a timm / torchvision state dict to a cspnet safetensors file",
        description=f"Known conversions: {listing}.",
    )
    p.add_argument("--from", dest="library", required=True, choices=sorted({lib for lib, _ in known}),
                   help="library the weights come from")
    p.add_argument("--in-chans", type=int, choices=(1, 3), default=None,
                   help="build the cspnet model for 1 (grey) or 3 (RGB) input channels (default: the source's); "
                        "an RGB first conv is summed over its colour channels for 1, a grey one spread over three for 3")
    p.add_argument("name", help="the model's name in that library, e.g. cspresnext50")
    p.add_argument("src", help="its state dict: .safetensors, or .pth (read with weights_only=True)")
    p.add_argument("out", help="output .safetensors file")
    p.set_defaults(func=run)


def run(args) -> int:
    conv = get_conversion(args.library, args.name)
    if not args.out.endswith(".safetensors"):
        raise ValueError(f"output {args.out!r} must be a .safetensors file")
    path = convert_file(args.library, args.name, args.src, args.out, in_chans=args.in_chans)
    meta = read_metadata(path)
    options = f"num_classes={meta['num_classes']}" + (f", in_chans={meta['in_chans']}" if meta["in_chans"] != 3 else "")
    if meta.get("last_level") is not None:  # the stages after it are not in the file
        options += f", features_only=True, out_indices={tuple(range(meta['last_level'] + 1))}"
    print(f"wrote {path}: cspnet model {conv.model!r} ({meta['num_classes']} classes, {meta['in_chans']} input channel(s)) "
          f"from {args.library} {args.name}")
    for line in meta["adapted"]:
        print(f"  adapted {line}")
    print(f"load with cspnet.create_model({conv.model!r}, {options}, pretrained={str(path)!r})")
    return 0
