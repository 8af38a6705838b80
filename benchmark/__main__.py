from benchmark.grid import main
import sys

sys.exit(main())
