// Types shared by every launcher in csrc/ (no torch header, no device code).
#pragma once

namespace pargo {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace pargo
