from kmerge.cli import main

main()
