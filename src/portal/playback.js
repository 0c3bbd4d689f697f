// Plays the recording named by #player's data-src with the vendored asciinema-player. A file,
// not an inline script: the page's Content-Security-Policy allows only the relay's own scripts.
"use strict";
(function () {
  var el = document.getElementById("player");
  if (!el || !window.AsciinemaPlayer) {
    return;
  }
  window.kubeRelayPlayer = window.AsciinemaPlayer.create(el.dataset.src, el, {
    fit: "width",
    controls: true,
    idleTimeLimit: 2,
    preload: true,
  });
})();
