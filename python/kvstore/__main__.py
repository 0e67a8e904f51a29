"""python -m kvstore: the version and the build's features."""
import kvstore


def main():
    f = kvstore.features()
    print(f"kvstore {f['version']}")
    print(f"  CUDA: {'yes' if f['cuda'] else 'no'}")
    print(f"  in-process store: yes, client: yes")
    # Where wave attends would run, as the engine itself says.
    with kvstore.Store(cuda_device=0 if f["cuda"] else None) as s:
        print(f"  attend path: {s.stats()['attend_path']}")


if __name__ == "__main__":
    main()
