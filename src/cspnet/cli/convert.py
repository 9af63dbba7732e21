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
    p.add_argument("name", help="the model's name in that library, e.g. cspresnext50")
    p.add_argument("src", help="its state dict: .safetensors, or .pth (read with weights_only=True)")
    p.add_argument("out", help="output .safetensors file")
    p.set_defaults(func=run)


def run(args) -> int:
    conv = get_conversion(args.library, args.name)
    if not args.out.endswith(".safetensors"):
        raise ValueError(f"output {args.out!r} must be a .safetensors file")
    path = convert_file(args.library, args.name, args.src, args.out)
    meta = read_metadata(path)
    print(f"wrote {path}: cspnet model {conv.model!r} ({meta['num_classes']} classes) from {args.library} {args.name}; "
          f"load with cspnet.create_model({conv.model!r}, pretrained={str(path)!r})")
    return 0
