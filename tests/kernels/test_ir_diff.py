"""scripts/kernel_ir_diff.py: IR canonicalisation tells renames and reorders from real changes."""
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("kernel_ir_diff", Path(__file__).resolve().parents[2] / "scripts" / "kernel_ir_diff.py")
ird = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ird)

IR = """#blocked = #ttg.blocked<{sizePerThread = [1]}>
#blocked1 = #ttg.blocked<{sizePerThread = [1, 1]}>
  %c1_i32 = arith.constant 1 : i32 loc(#loc1)
  %q = tt.load %ptr : tensor<128xbf16, #blocked> loc(#loc2)
  %k = tt.load %ptr2 : tensor<64xbf16, #blocked1>
  %s = arith.addi %q, %c1_i32 : tensor<128xbf16, #blocked>
#loc1 = loc("a.py":1:1)"""


def test_renamed_values_and_swapped_layout_aliases_are_identical():
    renamed = (IR.replace("%q", "%x").replace("#blocked1", "#TMP").replace("#blocked", "#blocked1")
               .replace("#TMP", "#blocked").replace("loc(#loc2)", "loc(#loc9)"))
    assert ird.verdict(ird.canonical(IR), ird.canonical(renamed)) == "identical"


def test_reorder_and_real_change_are_told_apart():
    lines = IR.splitlines()
    reordered = "\n".join(lines[:3] + [lines[4], lines[3]] + lines[5:])
    assert ird.verdict(ird.canonical(IR), ird.canonical(reordered)).startswith("reordered")
    changed = IR.replace("arith.addi", "arith.muli")
    assert ird.verdict(ird.canonical(IR), ird.canonical(changed)).startswith("differs")
