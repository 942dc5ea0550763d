#include "CPythonBridge.h"
